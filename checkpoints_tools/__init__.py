"""HF <-> Megatron-Core checkpoint conversion from the command line (see docs/converters.md).

A thin layer over the library: the conversions, the one name/layout mapping and the config bridge live in
``megatron_amir.convert`` (the trainer and eval use them too). Here: ``cli`` (``megatron-amir convert``),
``parity`` (logits of converted checkpoints at any TP/PP) and ``testing`` (tiny random HF models).
"""
