"""Train on one device (CPU, CUDA or Apple MPS): `python train_single.py [--config FILE] [key=value ...]`."""

from launch.processes.entry import main_single

if __name__ == "__main__":
    main_single()
