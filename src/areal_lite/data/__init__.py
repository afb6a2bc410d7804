"""Data stage: prompt datasets (files and the generated arithmetic set) and rewards."""
