"""Evaluation: loss over windows, generation scores, classifier scores, multiple choice, downstream evals."""
