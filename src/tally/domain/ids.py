"""The shapes of identifiers, shared by the API's validation and the key layout."""

import re

# Account ids never contain ':' so that key names built from them are unambiguous.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
SEQUENCE = re.compile(r"[0-9]{1,16}")
