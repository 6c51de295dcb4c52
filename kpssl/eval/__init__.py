"""Evaluation: metrics over volumes and experiment tables."""

from .metrics import PooledDice, VolumeScores, summarise, volume_scores

__all__ = ["PooledDice", "VolumeScores", "summarise", "volume_scores"]
