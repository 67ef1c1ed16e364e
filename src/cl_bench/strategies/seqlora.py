"""Sequential LoRA (SeqLoRA): one LoRA adapter (Hu et al., 2022, arXiv:2106.09685) on the frozen
language model, trained on each task in turn. The parameter-efficient lower bound used by O-LoRA,
SAPT and the IV-guided training paper; peft implements the adapter."""
from cl_bench.strategies._language_model import LoRAStrategy


class SeqLoRA(LoRAStrategy):
    description = "one LoRA adapter trained sequentially on every task (lower bound)"
