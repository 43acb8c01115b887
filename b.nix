derivation { name = "b"; system = "builtin"; builder = "builtin:fetchurl"; url = "http://127.0.0.1:47123/x"; outputHashMode = "flat"; }
