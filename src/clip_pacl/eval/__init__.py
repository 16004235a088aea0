"""Evaluations that are not one task's own: `eval.linear_probe` (a logistic regression on frozen image features)
and `eval.plots` (the figures of zero-shot and retrieval evaluations). Each task's evaluation lives with the task:
`zeroshot.evaluate` (accuracy), `retrieval.evaluate` (recall@k), `segmentation.evaluate` (mIoU).

Nothing is imported here: importing one evaluation should not load the others.
"""
