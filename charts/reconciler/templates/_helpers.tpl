{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "reconciler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "reconciler.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "reconciler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reconciler.labels" -}}
helm.sh/chart: {{ include "reconciler.chart" . }}
{{ include "reconciler.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "reconciler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reconciler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reconciler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reconciler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "reconciler.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the signing key. */}}
{{- define "reconciler.signingSecret" -}}
{{- default (printf "%s-signing" (include "reconciler.fullname" .)) .Values.signing.existingSecret }}
{{- end }}

{{/* Paths inside the pod. */}}
{{- define "reconciler.stateDir" -}}/var/lib/reconciler{{- end }}
{{- define "reconciler.gnupgHome" -}}/run/reconciler/gnupg{{- end }}
{{- define "reconciler.signingDir" -}}/etc/reconciler-signing{{- end }}
{{- define "reconciler.secretsDir" -}}/etc/reconciler-secrets{{- end }}

{{/* The daemon's Secrets that are set: name (of the volume and directory) -> Secret. */}}
{{- define "reconciler.daemonSecrets" -}}
{{- $out := dict }}
{{- range $name, $key := dict "webhook" "webhook" "reconcile-token" "reconcileToken" "repo-https" "repoHttps" "repo-ssh" "repoSsh" "s3" "s3" }}
{{- with (index $.Values.secrets $key).existingSecret }}
{{- $_ := set $out $name . }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}
{{/* The nix-daemon's socket, in an emptyDir only the reconciler and nix-daemon containers mount. */}}
{{- define "reconciler.nixDaemonSocketDir" -}}/run/nix-daemon{{- end }}

{{/* The builders' files for the nix-daemon sidecar (root's: written by the nix-builders
init container) and the mounted ssh key of the builders. */}}
{{- define "reconciler.nixBuildersDir" -}}/run/nix-builders{{- end }}
{{- define "reconciler.builderKeyDir" -}}/etc/reconciler-builder-ssh{{- end }}

{{/* reconciler.yaml */}}
{{- define "reconciler.config" -}}
{{- $signing := dict "gnupghome" (include "reconciler.gnupgHome" .) "key" .Values.signing.fingerprint }}
{{- if or .Values.signing.passphrase .Values.signing.existingSecret }}
{{- $_ := set $signing "passphrase_file" (printf "%s/passphrase" (include "reconciler.signingDir" .)) }}
{{- end }}
{{- if not (or .Values.signing.secretKey .Values.signing.existingSecret) }}
{{- fail "signing: set signing.secretKey (gpg --armor --export-secret-keys FINGERPRINT) or signing.existingSecret (a Secret with signing-key.asc)" }}
{{- end }}
{{- $cfg := dict
      "repo" .Values.config.repo
      "store" (include "reconciler.store" . | fromYaml)
      "state_dir" (include "reconciler.stateDir" .)
      "signing" $signing
      "nix" (.Values.config.nix | default dict)
      "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))
      "poll_interval" .Values.config.poll_interval
      "jobs" .Values.config.jobs
      "release_lifetime" .Values.config.release_lifetime
      "retry" .Values.config.retry }}
{{- $dir := include "reconciler.secretsDir" . }}
{{- $triggers := deepCopy (.Values.config.triggers | default dict) }}
{{- with .Values.secrets.webhook }}{{- if .existingSecret }}
{{- $_ := set $triggers "webhook_secret_file" (printf "%s/webhook/%s" $dir .key) }}
{{- end }}{{- end }}
{{- with .Values.secrets.reconcileToken }}{{- if .existingSecret }}
{{- $_ := set $triggers "reconcile_token_file" (printf "%s/reconcile-token/%s" $dir .key) }}
{{- end }}{{- end }}
{{- if $triggers }}
{{- $_ := set $cfg "triggers" $triggers }}
{{- end }}
{{- $repo := deepCopy .Values.config.repo }}
{{- with .Values.secrets.repoHttps }}{{- if .existingSecret }}
{{- $_ := set $repo "credentials_file" (printf "%s/repo-https/%s" $dir .key) }}
{{- end }}{{- end }}
{{- with .Values.secrets.repoSsh }}{{- if .existingSecret }}
{{- $_ := set $repo "ssh_key" (printf "%s/repo-ssh/%s" $dir .key) }}
{{- $_ := set $repo "known_hosts" (printf "%s/repo-ssh/%s" $dir .knownHostsKey) }}
{{- end }}{{- end }}
{{- $_ := set $cfg "repo" $repo }}
{{- if .Values.builders }}
{{- if not .Values.builderSshKey.existingSecret }}
{{- fail "builders: needs builderSshKey.existingSecret, the Secret with the builders' ssh key" }}
{{- end }}
{{- $key := printf "%s/%s" (include "reconciler.builderKeyDir" .) .Values.builderSshKey.key }}
{{- $builders := list }}
{{- range .Values.builders }}
{{- $builders = append $builders (merge (dict "ssh_key" $key) (deepCopy .)) }}
{{- end }}
{{- $_ := set $cfg "builders" $builders }}
{{- end }}
{{- toYaml (mergeOverwrite $cfg (deepCopy .Values.extraConfig)) }}
{{- end }}

{{/* The store server's nginx server block: deploy/nginx/store.conf, adapted to the pod. */}}
{{- define "reconciler.storeConf" -}}
{{- $conf := .Files.Get "files/store.conf" }}
{{- $conf = regexReplaceAll "(?m)^\\s*listen\\s+\\[::\\][^;]*;\\n" $conf "" }}
{{- $conf = regexReplaceAll "(?m)^(\\s*)listen\\s+80;" $conf (printf "${1}listen %d;" (int .Values.storeServer.port)) }}
{{- $conf = regexReplaceAll "(?m)^(\\s*)server_name\\s+[^;]*;" $conf "${1}server_name _;" }}
{{- $conf = regexReplaceAll "(?m)^(\\s*)root\\s+[^;]*;" $conf (printf "${1}root %s;" (include "reconciler.store" . | fromYaml).path) }}
{{- $conf = regexReplaceAll "(?m)^(\\s*)access_log\\s+[^;]*;" $conf "${1}access_log /dev/stdout;" }}
{{- $conf = regexReplaceAll "(?m)^(\\s*)error_log\\s+[^;]*;" $conf "${1}error_log /dev/stderr;" }}
{{- $conf }}
{{- end }}

{{/* The store of reconciler.yaml, by its type: a filesystem store gets its default path,
an S3 store gets only its own keys (never a path merged in from a default). */}}
{{- define "reconciler.store" -}}
{{- $store := deepCopy (.Values.config.store | default dict) }}
{{- $type := $store.type | default "filesystem" }}
{{- $_ := set $store "type" $type }}
{{- if eq $type "filesystem" }}
{{- $_ := set $store "path" ($store.path | default (printf "%s/store" (include "reconciler.stateDir" .))) }}
{{- else if eq $type "s3" }}
{{- if not $store.bucket }}
{{- fail "config.store: an s3 store needs config.store.bucket" }}
{{- end }}
{{- with .Values.secrets.s3 }}{{- if .existingSecret }}
{{- $_ := set $store "credentials_file" (printf "%s/s3/%s" (include "reconciler.secretsDir" $) .key) }}
{{- end }}{{- end }}
{{- end }}
{{- if and .Values.secrets.s3.existingSecret (ne $type "s3") }}
{{- fail "secrets.s3: S3 credentials for a store that is not config.store.type: s3" }}
{{- end }}
{{- toYaml $store }}
{{- end }}
