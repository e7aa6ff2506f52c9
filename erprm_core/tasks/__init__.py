"""Problem sources: ``arith`` (synthetic GSM8K-style generator), ``gsm8k`` and ``math500`` (hub or local JSONL).

Every source yields problem records ``{"id", "question", "answer", "solution", "task"}``; ``answer`` is the
normalised reference answer that :func:`erprm_core.grading.is_correct` compares against.
"""
