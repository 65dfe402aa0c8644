from sqltune.cli import main

raise SystemExit(main())
