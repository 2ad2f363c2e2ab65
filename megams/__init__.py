"""megams: distributed pretraining of multi-scale transformer language models.

    from megams import load_pretrained     # a converted model directory -> nn.Module (torch only)
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import megams` stays cheap and never pulls in torch or deepspeed
    if name == "load_pretrained":
        from megams.checkpoint.pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module 'megams' has no attribute {name!r}")
