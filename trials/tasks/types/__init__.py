"""Task types, one module each: the trainable model, loss, metrics, user rows and predictions of a task type
(``trials.tasks.base.TaskKind``), listed in ``trials.tasks.registry.TASK_TYPES``."""
