"""Training: one Lightning module for teachers, students and transfer runs."""
