"""minicurie's data: the Polish LAPT corpus built from Debian packages, users' text files, and token files."""
from data.documents import iter_documents, read_documents  # noqa: F401
from data.langid import is_polish, polish_score  # noqa: F401
from data.polish import build_corpus, default_corpus_dir  # noqa: F401
from data.tokens import cached_token_file, load_tokens, token_file_info, tokenize_to_file  # noqa: F401
