"""Data: binary tasks with attack sets (boolean, digits, MNIST, CIFAR-10)."""

from flatprior.data.tasks import DATASETS, Task, make_task, task_from_arrays

__all__ = ["DATASETS", "Task", "make_task", "task_from_arrays"]
