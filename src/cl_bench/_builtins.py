"""The strategies, scenarios and models that ship with cl-bench, registered by name."""
from cl_bench.models import cct, factory, lm
from cl_bench.registry import MODELS, SCENARIOS, STRATEGIES
from cl_bench.scenarios.chatterbot import ChatterBot
from cl_bench.scenarios.cifar100 import CIFAR100
from cl_bench.scenarios.cl_benchmark import LongSequence, StandardCL
from cl_bench.scenarios.cub import CUB
from cl_bench.scenarios.digits import Digits
from cl_bench.scenarios.fmnist import FashionMNIST
from cl_bench.scenarios.hf import HFClasses, HFInstructions
from cl_bench.scenarios.imagenet_a import ImageNetA
from cl_bench.scenarios.imagenet_r import ImageNetR
from cl_bench.scenarios.instruct_offline import InstructOffline
from cl_bench.scenarios.instruct_recurring import InstructRecurring
from cl_bench.scenarios.instruct_toy import InstructToy
from cl_bench.scenarios.objectnet import ObjectNet
from cl_bench.scenarios.omnibenchmark import OmniBenchmark
from cl_bench.scenarios.superni import SuperNI
from cl_bench.scenarios.toy import Toy
from cl_bench.scenarios.trace import TRACE
from cl_bench.scenarios.vtab import VTAB
from cl_bench.scenarios.wordnet import WordNet
from cl_bench.strategies.coin_ema import CoINEMA
from cl_bench.strategies.conpet import ConPETDynamic, ConPETStatic
from cl_bench.strategies.contracon import ConTraCon
from cl_bench.strategies.dkvb import DKVB
from cl_bench.strategies.er import ER
from cl_bench.strategies.finetune import Finetune
from cl_bench.strategies.hft import HFT
from cl_bench.strategies.iv_guided import IVGuided
from cl_bench.strategies.joint import Joint
from cl_bench.strategies.loramoe import LoRAMoE
from cl_bench.strategies.mos import MOS
from cl_bench.strategies.multitask import Multitask
from cl_bench.strategies.replay import Replay
from cl_bench.strategies.seqft import SeqFT
from cl_bench.strategies.seqlora import SeqLoRA
from cl_bench.strategies.simplecil import SimpleCIL

for name, strategy in {"finetune": Finetune, "joint": Joint, "er": ER, "simplecil": SimpleCIL,
                       "contracon": ConTraCon, "mos": MOS, "dkvb": DKVB,
                       "seqft": SeqFT, "seqlora": SeqLoRA, "replay": Replay, "multitask": Multitask,
                       "hft": HFT, "loramoe": LoRAMoE, "conpet_static": ConPETStatic,
                       "conpet_dynamic": ConPETDynamic, "coin_ema": CoINEMA, "iv_guided": IVGuided}.items():
    STRATEGIES.register(name, strategy)


def avalanche_strategy(name: str):
    """``avalanche.<Name>``: an Avalanche strategy through the generic adapter (imports avalanche only then)."""
    if not name.startswith("avalanche."):
        return None
    from cl_bench.strategies.avalanche import strategy_class
    return strategy_class(name.split(".", 1)[1])


STRATEGIES.fallback = avalanche_strategy
STRATEGIES.fallback_help["avalanche.<name>"] = (
    "an avalanche-lib strategy run by the generic adapter: naive, cumulative, replay, gdumb, ewc, si, mas, lwf, "
    "gem, agem, icarl, der, er_ace, er_aml, lamaml, mer, mir, lfl, fromscratchtraining, l2p (ViT backbones)")
for name, scenario in {"toy": Toy, "digits": Digits, "fmnist": FashionMNIST, "wordnet": WordNet,
                       "cifar100": CIFAR100, "imagenet_r": ImageNetR, "imagenet_a": ImageNetA, "cub": CUB,
                       "objectnet": ObjectNet, "omnibenchmark": OmniBenchmark, "vtab": VTAB,
                       "chatterbot": ChatterBot, "instruct_toy": InstructToy,
                       "instruct_offline": InstructOffline, "instruct_recurring": InstructRecurring,
                       "hf": HFClasses, "hf_instructions": HFInstructions, "trace": TRACE,
                       "standard_cl": StandardCL, "long_sequence": LongSequence, "superni": SuperNI}.items():
    SCENARIOS.register(name, scenario)
for model in (factory.mlp, factory.small_cnn, factory.vit_tiny_test, factory.efficientnet_lite0, factory.minilm,
              cct.cct, lm.smollm2_135m, lm.causal_lm, lm.tiny_llama):
    MODELS.register(model.__name__, model)
