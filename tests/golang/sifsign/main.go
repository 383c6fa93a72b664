// sifsign signs and verifies SIF images with the reference Go library's pkg/integrity
// (what Apptainer calls), so capsid's tests can check signatures both ways.
//
//	sifsign sign SECRET.asc FILE    sign every object group with the armored secret key
//	sifsign verify PUBLIC.asc FILE  verify every signature; print one line per verified
//	                                group: "ok FINGERPRINT ID..."; exit 1 on a failure
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/sylabs/sif/v2/pkg/integrity"
	"github.com/sylabs/sif/v2/pkg/sif"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}

func keyring(path string) openpgp.EntityList {
	f, err := os.Open(path)
	if err != nil {
		fail(err)
	}
	defer f.Close()
	el, err := openpgp.ReadArmoredKeyRing(f)
	if err != nil {
		fail(err)
	}
	return el
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: sifsign sign|verify KEY.asc FILE")
		os.Exit(2)
	}
	kr := keyring(os.Args[2])
	switch os.Args[1] {
	case "sign":
		f, err := sif.LoadContainerFromPath(os.Args[3])
		if err != nil {
			fail(err)
		}
		defer f.UnloadContainer() //nolint:errcheck
		s, err := integrity.NewSigner(f, integrity.OptSignWithEntity(kr[0]))
		if err != nil {
			fail(err)
		}
		if err := s.Sign(); err != nil {
			fail(err)
		}
	case "verify":
		f, err := sif.LoadContainerFromPath(os.Args[3], sif.OptLoadWithFlag(os.O_RDONLY))
		if err != nil {
			fail(err)
		}
		defer f.UnloadContainer() //nolint:errcheck
		cb := func(r integrity.VerifyResult) bool {
			if r.Error() != nil {
				return false
			}
			var ids []string
			for _, od := range r.Verified() {
				ids = append(ids, fmt.Sprint(od.ID()))
			}
			fmt.Printf("ok %X %s\n", r.Entity().PrimaryKey.Fingerprint, strings.Join(ids, " "))
			return false
		}
		v, err := integrity.NewVerifier(f, integrity.OptVerifyWithKeyRing(kr),
			integrity.OptVerifyCallback(cb))
		if err != nil {
			fail(err)
		}
		if err := v.Verify(); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown action", os.Args[1])
		os.Exit(2)
	}
}
