"""The `launch` command's tools: bench, slurm, doctor, predict, plot (and the dispatcher, cli). Training itself is train_single.py / train_ddp.py."""
