"""``verify``: prove that a merged model is base + adapter.

Weight level (``verify_weights``) streams one tensor of each model at a time. For an adapted
module with expected weight ``E = W + dW`` and merged weight ``M`` it measures the residual
``R = M - E`` against ``||dW||`` and passes when ``||R||`` is within the bound that rounding to
the merged dtype allows (see ``_lora_bound``). DoRA modules expect
``W' = m / ||W + dW||_row * (W + dW)`` (rows of the (out, in) weight) and their delta is
``W' - W``. Tensors the adapter does not touch must be bit-identical (or equal to a plain cast
when the merged dtype differs). A bitsandbytes-quantized merged model is dequantized and
each module reports the fraction of its delta that survived quantization.

Output level (``verify_outputs``) runs the base with the adapter through PEFT (unmerged) and the
merged model through transformers on the same inputs and compares their outputs.
"""

from loratool.verify._common import unit_roundoff
from loratool.verify.outputs import verify_outputs
from loratool.verify.weights import verify_weights

__all__ = ["unit_roundoff", "verify_outputs", "verify_weights"]
