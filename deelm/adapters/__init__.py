"""LoRA adapters: the flat parameter layout the C core reads (lora), PEFT
folders on disk (peft), and the adapters shipped for packaged models
(bundled). Inference never imports the trainer."""
