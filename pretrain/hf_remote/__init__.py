"""Self-contained transformers modeling code for the architectures transformers has no class for.

`configuration_hybrid.py` and `modeling_hybrid.py` are copied into every such export (loaded with
`trust_remote_code=True`), so they import only torch, transformers and each other: never this
project. `pretrain.model.hf` fills them from a HybridLM and reads them back.
"""
