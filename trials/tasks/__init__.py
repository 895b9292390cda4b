"""Downstream tasks: one module per task type (``types/``), one per source of rows (``sources/``), the tokenizers,
and one registry (``registry``) that a trial asks for its data, model, loss and metrics.

Task types (``trials.tasks.base.Split`` documents each one's rows): ``classification`` (a class label per sequence),
``causal_lm`` (prompt and response; the loss is on the response) and ``multiple_choice`` (a question and its choices,
each choice scored by the language model). Built-in tasks use real data that ships with the installed packages, so
they work offline (``digits``, ``pydoc_topics`` and the three stdlib tasks); user data comes from ``csv`` / ``jsonl``
files or a Hugging Face dataset, with columns named in space.yaml by role.
"""
