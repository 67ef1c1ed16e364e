"""SimpleCIL (Zhou et al., 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", arXiv:2303.07338, Sec. 4).

The pretrained backbone is never trained. After each task the prototype of every new class is
the mean embedding of its training samples; prediction is the cosine similarity between an
embedding and each prototype (the prototype classifier the paper builds on a frozen encoder).

Training-free: no optimizer step, so nothing for a budget to cut (a run with one fails saying so);
``samples_trained`` counts the examples averaged into prototypes. Prototypes are class means, not
stored examples (``examples_stored`` is 0).
"""
import torch
import torch.nn.functional as F

from cl_bench.strategies.base import Strategy


class SimpleCIL(Strategy):
    description = "prototype (class-mean) cosine classifier on a frozen pretrained backbone"
    honours_budget = False
    no_budget = "it is training-free (no optimizer steps); its prototypes average every training example of a task"

    def __init__(self, backbone, context, *, batch_size: int = 256, bf16: bool = False, compile: bool = False):
        super().__init__(backbone, context)
        self.use_precision(bf16=bf16, compile=compile)
        self.batch_size = batch_size
        self.backbone.requires_grad_(False)
        self.register_buffer("prototypes", torch.empty(0, backbone.out_dim))

    def embed(self, inputs) -> torch.Tensor:
        with self.autocast():
            return self.backbone(self.backbone.prepare(inputs, self.device)).float()

    @torch.no_grad()
    def learn(self, task):
        self.eval()
        sums = torch.zeros(max(task.classes) + 1, self.backbone.out_dim, device=self.device)
        counts = torch.zeros(max(task.classes) + 1, device=self.device)
        for inputs, targets in self.batches(task.train, self.batch_size, shuffle=False, description=task.name):
            sums.index_add_(0, targets, self.embed(inputs))
            counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float))
            self.samples_trained += len(targets)
        prototypes = torch.zeros_like(sums)
        prototypes[: len(self.prototypes)] = self.prototypes
        new = torch.tensor(task.classes, device=self.device)
        prototypes[new] = sums[new] / counts[new].clamp(min=1).unsqueeze(1)
        self.prototypes = prototypes

    def predict(self, inputs):
        return F.normalize(self.embed(inputs), dim=1) @ F.normalize(self.prototypes, dim=1).T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.prototypes = torch.empty_like(state_dict[prefix + "prototypes"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
