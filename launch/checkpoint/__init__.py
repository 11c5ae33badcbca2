"""Checkpoints: what they hold (state), their files and commit marker (store), checksums (integrity), the run directory (rundir), settings changed on a resume (changes)."""
