# A small stand-in for the NixOS module system, so tests/it/nixos.rs can
# evaluate contrib/nixos/module.nix without nixpkgs (which is not available
# offline). It keeps the behaviour the module relies on and that catches
# mistakes: options are declared with types and defaults, a definition of an
# undeclared option is an error, every definition is type-checked, mkIf is
# pushed down so conditions may read `config`, mkMerge merges, submodules
# and attrsOf/listOf/nullOr/enum merge as in nixpkgs, and `assertions` are
# collected. The `nixos` module below declares the few NixOS options the
# module sets (systemd.services, environment.etc, networking.firewall, ...).
let
  inherit (builtins)
    all any attrNames concatMap elem filter foldl' hasAttr head isAttrs isBool isFunction isInt isList isPath
    isString length listToAttrs map mapAttrs match replaceStrings stringLength substring toJSON typeOf;

  show = v: if isAttrs v && v ? outPath then v.outPath else toJSON v;
  optionType = v: isAttrs v && (v._type or "") == "option";

  lib = rec {
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: set: if cond then set else { };
    inherit (builtins) concatLists concatMap concatStringsSep;
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: listToAttrs (map (n: f n set.${n}) (attrNames set));
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
    filterAttrs = pred: set: listToAttrs (concatMap (n: optional (pred n set.${n}) (nameValuePair n set.${n})) (attrNames set));
    hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
    hasInfix = infix: s: length (builtins.split (escapeRegex infix) s) > 1;
    escapeRegex = replaceStrings
      [ "\\" "[" "]" "{" "}" "(" ")" "^" "$" "?" "*" "+" "|" "." ]
      [ "\\\\" "\\[" "\\]" "\\{" "\\}" "\\(" "\\)" "\\^" "\\$" "\\?" "\\*" "\\+" "\\|" "\\." ];
    # As nixpkgs: safe words stay bare, anything else is single-quoted.
    escapeShellArg = arg:
      let s = toString arg;
      in if match "[[:alnum:],._+:@%/-]+" s != null then s else "'${replaceStrings [ "'" ] [ "'\\''" ] s}'";
    escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
    literalExpression = text: { _type = "literalExpression"; inherit text; };

    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { type = types.bool; default = false; description = "Whether to enable ${name}."; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };

    types = rec {
      # One definition, or several equal ones.
      mergeEqual = loc: values:
        if all (v: v == head values) values then head values
        else throw "The option `${loc}' has conflicting definitions: ${concatStringsSep ", " (map show values)}";
      simple = name: check: { inherit name check; merge = mergeEqual; };
      bool = simple "boolean" isBool;
      str = simple "string" isString;
      int = simple "signed integer" isInt;
      ints.positive = simple "positive integer, meaning >0" (v: isInt v && v > 0);
      port = simple "16 bit unsigned integer; between 0 and 65535 (both inclusive)" (v: isInt v && v >= 0 && v <= 65535);
      path = simple "path" (v: (isPath v || isString v || (isAttrs v && v ? outPath)) && substring 0 1 (toString v) == "/");
      package = simple "package" (v: isAttrs v && (v.type or "") == "derivation");
      enum = values: simple "one of ${concatStringsSep ", " (map toJSON values)}" (v: elem v values);
      anything = {
        name = "anything";
        check = _: true;
        merge = loc: values:
          if all isAttrs values && !(any (v: v ? outPath) values) then
            mapAttrs (n: _: anything.merge "${loc}.${n}" (concatMap (v: lib.optional (hasAttr n v) v.${n}) values))
              (foldl' (acc: v: acc // v) { } values)
          else if all isList values then concatLists values
          else mergeEqual loc values;
      };
      nullOr = t: {
        name = "null or ${t.name}";
        check = v: v == null || t.check v;
        merge = loc: values: if all (v: v == null) values then null else t.merge loc (filter (v: v != null) values);
      };
      listOf = t: {
        name = "list of ${t.name}";
        check = isList;
        merge = loc: values: map (checked "${loc}.*" t) (concatLists values);
      };
      attrsOf = t: {
        name = "attribute set of ${t.name}";
        check = isAttrs;
        merge = loc: values:
          mapAttrs (n: _: t.merge "${loc}.${n}" (map (checked "${loc}.${n}" t) (concatMap (flatten) (concatMap (v: lib.optional (hasAttr n v) v.${n}) values))))
            (foldl' (acc: v: acc // v) { } values);
      };
      submodule = module: {
        name = "submodule";
        check = isAttrs;
        merge = loc: values: evalOptions loc module.options values;
      };
    };
  };

  # A definition's type check, with the NixOS message.
  checked = loc: type: value:
    if type.check value then value
    else throw "A definition for option `${loc}' is not of type `${type.name}'. Definition value: ${show value}";

  # mkIf/mkMerge at an option: conditions are evaluated here, when the
  # value is needed.
  flatten = v:
    if isAttrs v && (v._type or "") == "if" then (if v.condition then flatten v.content else [ ])
    else if isAttrs v && (v._type or "") == "merge" then concatMap flatten v.contents
    else [ v ];

  # mkIf/mkMerge above a namespace: pushed into its attributes without
  # evaluating a condition, so a module may set options under
  # `mkIf config.x.enable` (the names are known from the content).
  pushDown = v:
    if isAttrs v && (v._type or "") == "merge" then concatMap pushDown v.contents
    else if isAttrs v && (v._type or "") == "if" then map (mapAttrs (_: lib.mkIf v.condition)) (pushDown v.content)
    else [ v ];

  evalOptions = loc: decls: definitions:
    let
      defs = concatMap pushDown definitions;
      at = name: if loc == "" then name else "${loc}.${name}";
      undeclared = filter (n: !(hasAttr n decls)) (concatMap attrNames defs);
      value = name: decl:
        let here = concatMap (d: lib.optional (hasAttr name d) d.${name}) defs;
        in if optionType decl then
          let values = concatMap flatten here;
          in if values == [ ] then
            (if decl ? default then decl.default else throw "The option `${at name}' is used but not defined.")
          else decl.type.merge (at name) (map (checked (at name) decl.type) values)
        else evalOptions (at name) decl here;
    in
    if undeclared != [ ] then throw "The option `${at (head undeclared)}' does not exist."
    else mapAttrs value decls;

  mergeDecls = a: b:
    a // mapAttrs (n: v:
      if !(hasAttr n a) then v
      else if optionType v || optionType a.${n} then throw "The option `${n}' is declared twice."
      else mergeDecls a.${n} v) b;

  fakePackage = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  pkgs = {
    util-linux = fakePackage "util-linux";
    coreutils = fakePackage "coreutils";
    # What the README's flake builds nixfleet with.
    rustPlatform.buildRustPackage = args: fakePackage args.pname;
  };

  # The NixOS options the module sets, loosely typed where NixOS's own
  # types are large (systemd units).
  nixos = { lib, ... }: with lib; {
    options = {
      assertions = mkOption { type = types.listOf types.anything; default = [ ]; };
      environment.etc = mkOption { type = types.attrsOf (types.submodule { options.text = mkOption { type = types.str; }; }); default = { }; };
      systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.package = mkOption { type = types.package; default = fakePackage "systemd"; };
      nix.package = mkOption { type = types.package; default = fakePackage "nix"; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
      users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
    };
  };

  evalModules = modules:
    let
      args = { inherit lib config pkgs; };
      normalise = m:
        let v = if isFunction m then m args else m;
        in if v ? options || v ? config then { options = v.options or { }; config = v.config or { }; }
        else { options = { }; config = v; };
      evaluated = map normalise ([ nixos ] ++ modules);
      decls = foldl' mergeDecls { } (map (e: e.options) evaluated);
      config = evalOptions "" decls (map (e: e.config) evaluated);
    in
    { inherit config; options = decls; };
in
{
  inherit lib evalModules fakePackage;
  # What the test reads: failed assertions, or the parts of the system
  # the module builds.
  system = modules:
    let
      config = (evalModules modules).config;
      failed = map (a: a.message) (filter (a: !a.assertion) config.assertions);
    in
    if failed != [ ] then throw "Failed assertions:\n- ${lib.concatStringsSep "\n- " failed}"
    else config;
}
