"""Fine-tuned terratorch task models (``terratorch fit`` output) -> graphs + a ``task`` manifest section."""
from .checkpoint import CheckpointError, read_task_checkpoint
from .config import TaskConfigError, TaskSpec, parse_task_config
from .export import TaskExportConfig, export_task

__all__ = ["CheckpointError", "TaskConfigError", "TaskExportConfig", "TaskSpec", "export_task",
           "parse_task_config", "read_task_checkpoint"]
