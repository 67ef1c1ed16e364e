"""Sequential full fine-tuning (SeqFT): every weight of the language model trains on each task in
turn with next-token cross-entropy on the answers, nothing kept from earlier tasks. The lower
bound of TRACE (Wang et al., 2023, arXiv:2310.06762) and the HFT paper's "FFT" baseline."""
from cl_bench.strategies._language_model import LanguageModelStrategy


class SeqFT(LanguageModelStrategy):
    description = "sequential full fine-tuning of the language model (lower bound)"
