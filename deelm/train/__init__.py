"""DeeLM training: contrastive LoRA fine-tuning without torch.

train(model, data, output_dir, TrainingArguments(...)) is the entry point;
trainer runs the loop, data reads and batches the files, losses and optim
hold the loss functions and AdamW, checkpoint the resumable state."""
from deelm.train.trainer import TrainingArguments, TrainResult, train

__all__ = ["TrainingArguments", "TrainResult", "train"]
