"""The projections of a decoder layer, by their names in the parameter tree (the ones LoRA can adapt)."""

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
