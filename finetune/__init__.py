"""Fine-tuning on downstream tasks (`bert-finetune`, `bert-glue`): readers, heads, metrics, the training loop."""
