"""Train with DistributedDataParallel, one process per device. Any of:

    torchrun --standalone --nproc_per_node=3 train_ddp.py [--config FILE] [key=value ...]
    python train_ddp.py --nproc 3 [...]            # torch.multiprocessing.spawn, free port
    srun python train_ddp.py [...]                 # one SLURM task per device
"""

from launch.processes.entry import main_ddp

if __name__ == "__main__":
    main_ddp()
