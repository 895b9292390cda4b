"""Task sources, one module each: where a task's rows come from (``trials.tasks.base.TaskSource``), listed by
``task.name`` in ``trials.tasks.registry.SOURCES``."""
