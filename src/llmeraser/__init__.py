"""llmeraser: influence-function unlearning for PEFT-fine-tuned LLMs."""
