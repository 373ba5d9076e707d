"""Safety filtering: the domain and word blocklists, the shipped example lists, malformed list files, config
validation and speed with a list of the report's size."""

import pickle
import random
import time
from pathlib import Path

import pytest

from internlm2_jax.data.curation import safety
from internlm2_jax.data.curation.safety import (
    BlocklistError,
    SafetyConfig,
    SafetyFilter,
    load_domains,
    load_words,
    url_host,
)

ARTICLE = """\
The city council met on Tuesday to discuss the new harbour plan. Residents asked about parking, the classic \
market hall and the classes at the sailing school, which will move to the old customs house next spring.
"""


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


@pytest.fixture(scope="module")
def example():
    return SafetyFilter(SafetyConfig.example())


def test_example_lists_are_shipped_inside_the_package(example):
    folder = Path(safety.__file__).parent / "blocklists"
    assert {p.name for p in folder.glob("*.txt")} == {"example_domains.txt", "example_words.txt"}
    assert len(example.domains) >= 12 and all(d.endswith((".test", ".example")) for d in example.domains)
    assert sum(map(len, example.phrases.values())) >= 10 and len(example.substrings) >= 2


def test_every_example_entry_blocks(example):
    for domain in example.domains:
        assert example.check(ARTICLE, url=f"https://news.{domain}/today").reasons == ("blocked_domain",)
    for tokens in (t for phrases in example.phrases.values() for t in phrases):
        assert example.check(f"{ARTICLE} {' '.join(tokens).title()}!").reasons == ("blocked_words",), tokens
    for entry in example.substrings:
        assert example.check(f"市议会周二开会，讨论{entry}的问题。").reasons == ("blocked_words",), entry


@pytest.mark.parametrize("url,blocked", [
    ("https://malware-example.test/download.exe", "malware-example.test"),
    ("http://a.b.malware-example.test/x?y=1", "malware-example.test"),  # any parent domain
    ("HTTPS://WWW.Malware-Example.TEST:8443/", "malware-example.test"),  # case, www., port
    ("ftp://user:secret@casino-jackpot-example.test/", "casino-jackpot-example.test"),  # user info
    ("casino-jackpot-example.test/page.html", "casino-jackpot-example.test"),  # no scheme
    ("//online-betting-example.test/", "online-betting-example.test"),
    ("http://online-betting-example.test./", "online-betting-example.test"),  # trailing dot
    ("https://example.org/article", None),
    ("https://notmalware-example.test/", None),  # a longer name is not a subdomain
    ("https://malware-example.test.example.org/", None),  # the listed name inside another domain
    ("https://example.org/?ref=malware-example.test", None),  # only the host counts
    (None, None),
    ("", None),
    ("not a url", None),
    ("http://[::1/broken", None),
    ("http://", None),
    ("javascript:void(0)", None),
])
def test_domain_matching(example, url, blocked):
    assert example.blocked_domain(url) == blocked
    result = example.check(ARTICLE, url=url)
    assert result.passed == (blocked is None) and result.domain == blocked
    assert result.counts["blocked_domain"] == (blocked is not None)


def test_domain_list_format(tmp_path):
    path = write(tmp_path, "domains.txt", "\ufeff# spam sites\n\nspam-site.test  # since 2021\nWWW.Upper.TEST\n"
                                          "*.wild.test\nhttps://from-url.test/path\n例子.测试\n10.0.0.1\n")
    assert load_domains(path) == {"spam-site.test", "upper.test", "wild.test", "from-url.test",
                                  "xn--fsqu00a.xn--0zwm56d", "10.0.0.1"}
    blocker = SafetyFilter(SafetyConfig(domain_blocklist=path))
    assert blocker.blocked_domain("http://www.例子.测试/页面") == "xn--fsqu00a.xn--0zwm56d"
    assert blocker.blocked_domain("http://10.0.0.1:8080/") == "10.0.0.1"
    assert url_host("http://Sub.Example.ORG.:80/") == "sub.example.org"


@pytest.mark.parametrize("text,matches", [
    ("Learn to play casino bonus games.", {"casino bonus": 1}),
    ("CASINO-BONUS, casino\nbonus and Casino_Bonus.", {"casino bonus": 3}),  # case, punctuation, line break
    ("Casinos bonuses and a casino, then a bonus.", {}),  # word boundaries: not inside longer words
    ("xxx XXX xxxl", {"xxx": 2}),
    ("他们在网上搞网络赌博，还刷单。", {"网络赌博": 1, "刷单": 1}),  # CJK: substrings, no spaces needed
    ("下载APP刷单赚钱 app刷单", {"app刷单": 2, "刷单": 2}),  # mixed entry; overlapping entries both count
    ("网络 赌博", {}),  # a CJK entry does not match across a space
])
def test_word_matching(tmp_path, text, matches):
    path = write(tmp_path, "words.txt", "casino bonus\nxxx\n网络赌博\n刷单\nAPP刷单\n")
    assert dict(SafetyFilter(SafetyConfig(word_blocklist=path)).blocked_words(text)) == matches


def test_class_does_not_match_classic(tmp_path):
    blocker = SafetyFilter(SafetyConfig(word_blocklist=write(tmp_path, "w.txt", "class\nsailing school\n")))
    assert dict(blocker.blocked_words(ARTICLE)) == {"sailing school": 1}
    assert blocker.check(ARTICLE + " First class.").counts["blocked_words"] == 2


def test_max_blocked_words_counts_and_top_matches(tmp_path):
    entries = [f"spamword{i}" for i in range(8)]
    path = write(tmp_path, "words.txt", "\n".join(entries))
    text = ARTICLE + " ".join(entries) + " spamword0 spamword0"
    strict = SafetyFilter(SafetyConfig(word_blocklist=path)).check(text)
    assert not strict.passed and strict.reasons == ("blocked_words",)
    assert strict.counts == {"blocked_domain": 0, "blocked_words": 10}
    assert len(strict.matches) == 5 and strict.matches["spamword0"] == 3  # the top few, most frequent first
    lenient = SafetyFilter(SafetyConfig(word_blocklist=path, max_blocked_words=10)).check(text)
    assert lenient.passed and lenient.reasons == () and lenient.counts["blocked_words"] == 10
    assert not SafetyFilter(SafetyConfig(word_blocklist=path, max_blocked_words=9)).check(text).passed


def test_clean_documents_pass(example):
    for text in (ARTICLE, "市议会周二开会，讨论新的港口规划。居民们询问了停车和航海学校的问题。", ""):
        result = example.check(text, url="https://news.example.org/harbour")
        assert result.passed and result.reasons == () and result.matches == {}
        assert result.counts == {"blocked_domain": 0, "blocked_words": 0}


def test_no_lists_pass_everything():
    result = SafetyFilter(SafetyConfig()).check("casino bonus 网络赌博", url="https://malware-example.test/")
    assert result.passed and result.counts == {"blocked_domain": 0, "blocked_words": 0}


def test_both_reasons_and_both_list_kinds_together(example):
    result = example.check(ARTICLE + " Get rich quick!", url="http://casino-jackpot-example.test/")
    assert result.reasons == ("blocked_domain", "blocked_words")
    assert result.counts == {"blocked_domain": 1, "blocked_words": 1} and result.matches == {"get rich quick": 1}


def test_filter_pickles_for_worker_processes(example):
    clone = pickle.loads(pickle.dumps(example))
    assert clone.check("Free spins!").reasons == ("blocked_words",)


@pytest.mark.parametrize("content,message", [
    (b"casino\n\x00\x01\x02binary", ":2: a NUL byte"),
    (b"casino\nbonus\n\xff\xfe broken", ":3: not UTF-8 text"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, content, message):
    path = write(tmp_path, "bad.txt", content)
    for config in (SafetyConfig(word_blocklist=path), SafetyConfig(domain_blocklist=path)):
        with pytest.raises(BlocklistError, match=f"bad.txt{message}"):
            SafetyFilter(config)


@pytest.mark.parametrize("kind,content,message", [
    ("domain_blocklist", "good.test\nbad domain with spaces\n", ":2: not a domain: 'bad domain with spaces'"),
    ("domain_blocklist", "good.test\n\nhttp://\n", ":3: not a domain"),
    ("word_blocklist", "fine\n# comment\n!!!\n", ":3: no letters or digits"),
    ("word_blocklist", "网络 赌博\n", ":1: an entry with CJK characters has no spaces"),
])
def test_malformed_entries_name_the_file_and_line(tmp_path, kind, content, message):
    path = write(tmp_path, "list.txt", content)
    with pytest.raises(BlocklistError, match=f"list.txt{message}"):
        SafetyFilter(SafetyConfig(**{kind: path}))


def test_unreadable_files(tmp_path):
    with pytest.raises(BlocklistError, match="missing.txt: cannot read it"):
        load_words(str(tmp_path / "missing.txt"))
    with pytest.raises(BlocklistError, match="cannot read it"):
        load_domains(str(tmp_path))  # a directory


@pytest.mark.parametrize("field,value,message", [
    ("domain_blocklist", "", "domain_blocklist: expected a file path"),
    ("word_blocklist", "  ", "word_blocklist: expected a file path"),
    ("word_blocklist", 3, "word_blocklist: expected a file path"),
    ("max_blocked_words", -1, "max_blocked_words: expected an integer >= 0"),
    ("max_blocked_words", 1.5, "max_blocked_words: expected an integer >= 0"),
    ("max_blocked_words", True, "max_blocked_words: expected an integer >= 0"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SafetyConfig(**{field: value})


def test_command_line_overrides():
    from internlm2_jax.overrides import apply_overrides

    config = apply_overrides(SafetyConfig(), ["domain_blocklist=example", "max_blocked_words=2"])
    assert config == SafetyConfig(domain_blocklist="example", max_blocked_words=2)
    assert SafetyFilter(config).blocked_domain("http://free-prize-spam.test/") == "free-prize-spam.test"


def test_a_list_of_the_reports_size_is_fast(tmp_path):
    """36k entries (words, phrases of up to 4 words, Chinese terms) against 100 KB English and Chinese documents:
    the cost is a pass over the document, not over the list (no timing assertion; the time is printed)."""
    rng = random.Random(0)
    letters, hanzi = "abcdefghijklmnopqrstuvwxyz", "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"
    word = lambda: "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))
    entries = {word() for _ in range(24_000)}
    entries |= {" ".join(word() for _ in range(rng.randint(2, 4))) for _ in range(6_000)}
    entries |= {"".join(rng.choice(hanzi) for _ in range(rng.randint(2, 6))) for _ in range(6_000)}
    entries = sorted(entries)
    blocker = SafetyFilter(SafetyConfig(word_blocklist=write(tmp_path, "big.txt", "\n".join(entries))))
    english = " ".join(word() for _ in range(15_000))[:100_000] + " " + entries[0] + " " + entries[-1]
    chinese = "".join(rng.choice(hanzi + "，。") for _ in range(33_000))  # ~100 KB of UTF-8
    start = time.perf_counter()
    found_english, found_chinese = blocker.blocked_words(english), blocker.blocked_words(chinese)
    elapsed = time.perf_counter() - start
    print(f"{len(entries)} entries, 2 x 100 KB documents: {elapsed * 1000:.0f} ms")
    assert found_english[entries[0]] >= 1 and found_english[entries[-1]] >= 1
    assert sum(found_chinese.values()) > 100  # random short Chinese entries do occur in random Chinese text
