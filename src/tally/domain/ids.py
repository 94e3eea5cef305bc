"""The shapes of identifiers, shared by the API's validation and the key layout."""

import re

from tally.domain.limits import ACCOUNT_ID_BYTES_MAX

# Account ids never contain ':' so that key names built from them are unambiguous.
ACCOUNT_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@-]{{0,{ACCOUNT_ID_BYTES_MAX - 1}}}")
SEQUENCE = re.compile(r"[0-9]{1,16}")
