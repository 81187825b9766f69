"""BLIP training: pretraining the MED, fine-tuning a captioner or a filter (`capfilt train`)."""

# The training tasks (`capfilt train TASK`), declared here, where the command line can read them
# without importing torch (train/config.py imports the MED).
TASKS = ("pretrain", "finetune-captioner", "finetune-filter")
