import os

import pytest
import torch

# tests are about numbers, not throughput: keep them off the other core's back
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
