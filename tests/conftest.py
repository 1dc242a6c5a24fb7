import torch

# keep runs small: the machine is shared
torch.set_num_threads(1)
