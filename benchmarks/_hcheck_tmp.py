import torch
from tqlab.rotation import FastHadamard, make_rotation
for d in (64, 128, 256):
    r = FastHadamard(d, seed=1)
    x = torch.randn(1000, d)
    cpu = r.apply(x)
    rc = r.cuda()
    gpu = rc.apply(x.cuda()).cpu()
    inv = rc.inverse(rc.apply(x.cuda())).cpu()
    other = FastHadamard(d, seed=2)
    rc.load_state_dict(other.state_dict())
    after = rc.apply(x.cuda()).cpu()
    print(d, (cpu - gpu).abs().max().item(), (inv - x).abs().max().item(), (after - other.apply(x)).abs().max().item())
