"""Serving engines: what vLLM, SGLang, llama.cpp and mlx-lm accept (``rules``), ``check`` an
adapter against one, and ``fix`` it into the nearest adapter the engine accepts."""
