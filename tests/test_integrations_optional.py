"""The frameworks stay optional: importing swm_fused, its integrations package or the framework-free timm
drop-in loads none of them (checked once, in a fresh interpreter, for all four integrations)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm", "torchvision", "diffusers")


def test_import_swm_fused_imports_no_framework():
    code = ("import sys, swm_fused, swm_fused.integrations, swm_fused.integrations.timm\n"
            "swm_fused.WeightAverager, swm_fused.AveragingEngine, swm_fused.swa_utils, swm_fused.optim\n"
            f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
