"""Ablation of the allocation's importance weights (exploratory; held-out training images only).

    python benchmarks/ablate_importance.py [resnet20]

Compares, at 10x and 12x post-training, activation-aware MSE alone (mse) with the relevance factor of
`lrp` at two powers, the gradient x activation factor (taylor), relevance started from all classes, and
the LRP-epsilon composite. Accuracy on 3,000 held-out training images; the test split is never used.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import time
from dataclasses import replace
from lrpcompress.models import load_model
from lrpcompress.data import load_data, split_train_val
from lrpcompress.compress import compress, method_config
from lrpcompress.evaluation import accuracy
arch = sys.argv[1] if len(sys.argv) > 1 else "resnet20"
SHARED = Path(__file__).resolve().parents[2] / "shared"
m = load_model(arch, SHARED / "models" / f"{arch}-cifar10jpeg.pt")
tr = load_data(SHARED / "data" / "cifar10-jpeg", "train")
fit, val = split_train_val(tr, 3000, 0)
print("base", accuracy(m, val, show_progress=False), flush=True)
cache={}
for ratio in (10.0, 12.0):
    for meth, kw in [("mse",{}),("lrp",{"power":0.25}),("lrp",{"power":0.5}),("taylor",{"power":0.25}),("lrp",{"power":0.25,"start":"all"}),("lrp",{"power":0.25,"composite":"epsilon"})]:
        cfg = method_config(meth)
        q = replace(cfg.quant, power=kw.get("power", cfg.quant.power))
        rel = replace(cfg.relevance, start=kw.get("start","true"), composite=kw.get("composite", cfg.relevance.composite))
        cfg = replace(cfg, quant=q, relevance=rel, target_ratio=ratio)
        t=time.time(); r = compress(m, fit, cfg, arch, scores=cache, show_progress=False)
        print(arch, ratio, meth, kw, round(accuracy(r.compressed.to_module(), val, show_progress=False),2), round(r.compressed.stats()["mean_bits"],2), round(time.time()-t,1), flush=True)
