"""SpecPC with the packaged real draft keeps a needle in a ~4k-token story, and in ~2.5k tokens of Chinese."""

from __future__ import annotations

import random

import pytest

from draft_rag import SpecPC
from draft_rag.commands.demo import needle_haystack
from draft_rag.models import DEFAULT_DRAFT

pytestmark = pytest.mark.real_model

CHINESE_SENTENCES = (
    "清晨的市场里，卖菜的老人把新鲜的青菜整齐地摆在竹篮中。",
    "河边的柳树随风摇动，几只白鹭在浅水里慢慢走着寻找小鱼。",
    "图书馆的二楼有一排靠窗的座位，下午的阳光总是照在旧木桌上。",
    "山村的小学只有三间教室，孩子们每天要走一个小时的山路来上课。",
    "厨房里飘出红烧肉的香味，祖母说火候比调料更重要。",
    "火车穿过长长的隧道，车厢里的灯光忽明忽暗，旅客们都安静下来。",
    "秋天到了，果园里的苹果挂满枝头，农民们忙着采摘和装箱。",
    "老街的茶馆里，几位退休的工程师正在讨论一座新桥的设计。",
    "夜里下了一场大雨，第二天早上街道上到处都是落叶和水洼。",
    "博物馆新展出了一批古代的青铜器，吸引了许多学生前来参观。",
    "港口的渔船在黄昏时陆续归来，码头上堆满了刚捕到的海鱼。",
    "她在日记里写道，学习一门新的语言就像在陌生的城市里慢慢认路。",
    "工厂的机器整夜运转，值班的技术员每两个小时检查一次温度。",
    "冬天的湖面结了厚厚的冰，附近的居民在上面滑冰和钓鱼。",
)
CHINESE_KEYS = ("月光", "琥珀", "风筝", "银杏")


def chinese_haystack(tokenizer, tokens: int, depth: float, seed: int) -> tuple[list[str], str, str]:
    """About ``tokens`` tokens of Chinese prose in three documents, a 7-digit needle at ``depth``."""
    rng = random.Random(seed)
    key, answer = rng.choice(CHINESE_KEYS), str(rng.randint(1_000_000, 9_999_999))
    paragraphs: list[str] = []
    used = 0
    while used < tokens:
        paragraph = "".join(rng.sample(CHINESE_SENTENCES, 6))
        paragraphs.append(paragraph)
        used += len(tokenizer(paragraph, add_special_tokens=False)["input_ids"])
    paragraphs.insert(round(depth * len(paragraphs)), f"关于{key}的特别魔法数字是{answer}。")
    third = -(-len(paragraphs) // 3)
    docs = ["\n".join(paragraphs[i : i + third]) for i in range(0, len(paragraphs), third)]
    return docs, f"关于{key}的特别魔法数字是多少？", answer


@pytest.fixture(scope="module")
def specpc():
    pc = SpecPC(draft=DEFAULT_DRAFT, budget=512)
    pc.load()
    return pc


@pytest.mark.parametrize("depth", [0.05, 0.5, 0.95])
def test_needle_survives_compression(specpc, depth):
    docs, question, answer = needle_haystack(specpc.load().tokenizer, 3800, depth, seed=int(depth * 100))
    result = specpc.compress(question, docs)
    assert 3500 <= result.total_original_tokens <= 4300
    assert result.total_kept_tokens <= 512
    assert answer in "\n".join(result.texts)
    assert len(result.documents) == len(docs)


@pytest.mark.parametrize("depth", [0.2, 0.8])
def test_needle_survives_in_chinese_prose(specpc, depth):
    docs, question, answer = chinese_haystack(specpc.load().tokenizer, 2500, depth, seed=int(depth * 100))
    result = specpc.compress(question, docs)
    assert 2300 <= result.total_original_tokens <= 3200
    assert 256 <= result.total_kept_tokens <= 512
    assert answer in "\n".join(result.texts)
