"""Fine-tuning on downstream tasks (`bert-finetune`): readers, heads, metrics and the training loop."""
