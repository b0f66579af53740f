"""torch-pruning wrappers: importance, pruner, and the pruning history that makes checkpoints pickle-free."""
import torch
import torch_pruning as tp

EXAMPLE_SIZE = 64


def example_inputs(size=EXAMPLE_SIZE, device="cpu"):
    """A small input for tracing: the dependency graph does not depend on the spatial size."""
    return torch.randn(1, 3, size, size, device=device)


def replay_pruning_history(model, history):
    """Rebuild a pruned network: trace the dense model, then redo each recorded channel removal."""
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(), verbose=False)
    graph.load_pruning_history([(name, bool(out), list(idx)) for name, out, idx in history])
    model.train(was_training)
    return model
