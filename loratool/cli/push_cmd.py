"""`loratool push`."""

from __future__ import annotations

import click

from loratool.cli.common import Output, common_options, json_option
from loratool.hub import push


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


_CARD_NOTES = {
    "generated": ("generated model card", "generated"),
    "replaced-template": ("generated model card, replacing PEFT's template", "generated, replacing PEFT's template README.md"),
    "completed": ("README.md with metadata completed", "the folder's README.md, metadata and loratool section added"),
    "kept": ("", "the folder's own, unchanged"),
}


def report_push(out: Output, result: dict) -> None:
    """Print a push result (files, what was left out, the card on a dry run, the URL).

    Args:
        out: where to print (human, JSON or quiet).
        result: the dict ``loratool.hub.push`` returns.
    """
    if out.json_mode:
        out.json(result)
        return
    where = result["repo_id"] + (f" (branch {result['revision']})" if result["revision"] else "")
    verb = "would push" if result["dry_run"] else "pushed"
    pr = " as a pull request" if result["create_pr"] else ""
    vis = ", private" if result["private"] else ""
    out.info(f"{verb} {result['kind']} {result['path']} to {where}{pr}{vis}: {len(result['files'])} files, {_size(result['total_size'])}")
    width = max(len(f["path"]) for f in result["files"])
    file_note, card_note = _CARD_NOTES.get(result.get("card_source") or "generated", ("", ""))
    for f in result["files"]:
        note = f"  ({file_note})" if f.get("generated") and file_note else ""
        out.info(f"  {f['path']:<{width}}  {_size(f['size']):>10}{note}")
    if result["left_out"]:
        shown = result["left_out"][:20]
        more = f" and {len(result['left_out']) - 20} more" if len(result["left_out"]) > 20 else ""
        out.info(f"left out (add with --include GLOB): {', '.join(shown)}{more}")
    if result["dry_run"] and result["card"] is not None:
        out.info(f"--- README.md ({card_note}) ---")
        out.info(result["card"].rstrip("\n"))
        out.info("--- end of README.md ---")
    url = result.get("pr_url") or result.get("commit_url")
    if url:
        out.info(url)


@click.command("push")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created when missing; default main).")
@click.option("--commit-message", metavar="M", help="Commit title.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would be uploaded; no network.")
@click.option("--include", multiple=True, metavar="GLOB", help="Also send files matching GLOB (repeatable), e.g. 'checkpoint-500' or '*.pt'.")
@click.option("--base", help="Base model (folder or repo id) for the card, when adapter_config does not name it usably.")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or the saved login).")
@json_option
@common_options
def command(path, repo_id, private, revision, commit_message, create_pr, dry_run, include, base, token, as_json, quiet):
    """Upload the adapter or merged model in PATH to the Hub repo REPO_ID.

    Only the adapter's (or model's) own files are sent: optimizer and scheduler states, RNG
    states, trainer state and checkpoint-*/ folders are left out unless --include names them.
    When PATH has no README.md, or only the template PEFT writes, a model card is generated from
    `loratool inspect`; a README.md of your own without base_model metadata keeps its text and
    gains the metadata and the loratool section. Nothing is written into PATH.

    \b
    Example:
      loratool push fixtures/adapters/llama-lora my-org/llama-lora --dry-run
    """
    out = Output(json_mode=as_json, quiet=quiet)
    result = push(
        path,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        dry_run=dry_run,
        include=include,
        token=token,
        base=base,
    )
    report_push(out, result)
