"""The only code in vllm-specx that imports vLLM. Every vLLM internal it relies on is declared in
`compat.py` and checked when the plugin is used."""
