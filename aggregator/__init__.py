"""Pyramid nodes, pooling heads, trainers, the multiple-kernel SVM, fine-tuning, evaluation."""
