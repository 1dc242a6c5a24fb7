"""Without the compiled extension the package imports, warns once, and runs the references."""
import subprocess
import sys
import textwrap


def test_package_falls_back_to_the_reference_and_warns_once():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["torchopt_ext._C"] = None  # makes `from torchopt_ext import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, torchopt_ext
            from torchopt_ext import ops
            import torchopt_ext.activations
        msgs = [str(w.message) for w in caught if "compiled extension did not load" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert not torchopt_ext.extension_available()
        q = torch.randn(5, 4, dtype=torch.float64); b = torch.randn(5, 4, dtype=torch.float64)
        z = torch.rand(5, dtype=torch.float64) + 1
        for name in ["relu", "arctan", "hardtanh", "smoothstep", "identity"]:
            a = ops.ib_alpha(q, b, z, 0.3, 0.01, name)
            assert torch.equal(a, ops.ib_alpha_reference(q, b, z, 0.3, 0.01, name)), name
        assert torchopt_ext.activations.get("relu").flops is None
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
