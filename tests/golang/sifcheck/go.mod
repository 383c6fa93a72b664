module capsid.test/sifcheck

go 1.19

require (
	github.com/google/uuid v1.3.0
	github.com/sylabs/sif/v2 v2.8.3
)

// Built offline against the sources Debian ships (golang-github-sylabs-sif-dev).
replace github.com/sylabs/sif/v2 => /usr/share/gocode/src/github.com/sylabs/sif

replace github.com/google/uuid => /usr/share/gocode/src/github.com/google/uuid
