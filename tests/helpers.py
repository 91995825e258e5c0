import torch
from conftest import DEVICE  # noqa: F401


def assert_close_to(name, got, want, atol, rtol=0.0):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs()
    tol = atol + rtol * want.abs()
    if not bool((err <= tol).all()):
        i = int((err - tol).argmax())
        raise AssertionError(
            f"{name}: max |err| {err.max().item():.3g} > tol; worst at flat {i}: got {got.flatten()[i].item():.6g} "
            f"want {want.flatten()[i].item():.6g}"
        )


def assert_low_precision_close(name, got, ref_low, ref_fp32, slack=2.0, atol=1e-3):
    """bf16 check (flash-attention's rule): the kernel's error against the fp32 reference is at
    most ``slack`` x that of the PyTorch reference run in the same low precision, + atol."""
    want = ref_fp32.detach().double().cpu()
    e_kernel = (got.detach().double().cpu() - want).abs().max().item()
    e_ref = (ref_low.detach().double().cpu() - want).abs().max().item()
    assert e_kernel <= slack * e_ref + atol, f"{name}: kernel err {e_kernel:.3g} vs reference bf16 err {e_ref:.3g}"


def random_labels(shape, V, ignore_frac=0.2, ignore_index=-100, device="cpu"):
    y = torch.randint(0, V, shape, device=device)
    y[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return y
