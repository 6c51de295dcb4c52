"""Evaluation: metrics over volumes and experiment tables."""

from .attention import KAFAttention, attention_by_distance, kaf_attention, row_stability, row_statistics
from .metrics import PooledDice, VolumeScores, summarise, volume_scores

__all__ = ["KAFAttention", "attention_by_distance", "kaf_attention", "row_stability", "row_statistics", "PooledDice", "VolumeScores", "summarise", "volume_scores"]
