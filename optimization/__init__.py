"""The book's production case study: every optimization added step by step, each step measured."""
