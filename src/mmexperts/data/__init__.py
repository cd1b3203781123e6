"""Datasets for mmexperts: procedurally generated image-text tasks."""
